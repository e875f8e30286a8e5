"""Worker for tests/test_distributed.py, launched by torchrun: trains a tiny retriever with DDP
on the CPU (gloo) and saves this process's final weights."""

import json
import sys
from dataclasses import replace
from pathlib import Path


def main(records_file: str, out_dir: str, grad_cache_chunk_size: str = "0") -> None:
    import torch
    from datasets import Dataset
    from safetensors.torch import save_file

    from retrieval_lib import config, tokenizer, training
    from retrieval_lib.expansion import UnfreezeSchedule, expand_layers
    from retrieval_lib.modeling import DualTowerRetriever

    records = json.loads(Path(records_file).read_text(encoding="utf-8"))
    texts = [r["query"] for r in records] + [p["text"] for r in records
                                             for p in r["positive_passages"]]
    tok = tokenizer.train_bpe_tokenizer(texts, vocab_size=300)
    cfg = replace(config.MINIMIND_27M, hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                  vocab_size=len(tok), max_query_length=12, max_passage_length=32,
                  projection_dim=16)
    torch.manual_seed(0)
    model = DualTowerRetriever.from_config(cfg, tokenizer=tok, pretrained=False)
    new = expand_layers(model.encoder, 1, init="identity", seed=0)
    train = Dataset.from_list(records[:32])
    validation = Dataset.from_list(records[32:])
    tcfg = config.TrainingConfig(epochs=2, batch_size=4, learning_rate=1e-3,
                                 num_hard_negatives=1, early_stopping_patience=5,
                                 grad_cache_chunk_size=int(grad_cache_chunk_size))
    training.train_retriever(model, train, validation, tcfg, out_dir, show_progress=False,
                             unfreeze=UnfreezeSchedule(new, every=1))
    rank = torch.distributed.get_rank()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if k != "passage_projection.weight" and k != "passage_projection.bias"},
              str(Path(out_dir) / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
