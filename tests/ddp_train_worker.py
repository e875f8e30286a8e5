"""Worker for tests/test_distributed.py, launched by torchrun: trains a tiny retriever with DDP
on the CPU (gloo) and saves this process's final weights and the index batches it trained on
in epochs 1 and 2. ``chunking``: a GradCache chunk size, or ``t<N>`` for a sub-batch token
budget of N."""

import json
import sys
from pathlib import Path


def main(records_file: str, out_dir: str, chunking: str = "0") -> None:
    import torch
    from datasets import Dataset
    from safetensors.torch import save_file
    from toy import worker_model  # this script's folder is on sys.path

    from retrieval_lib import training
    from retrieval_lib.models import UnfreezeSchedule, expand_layers
    from retrieval_lib.settings import config, distributed
    from retrieval_lib.training import batching

    records = json.loads(Path(records_file).read_text(encoding="utf-8"))
    model = worker_model(records)
    new = expand_layers(model.encoder, 1, init="identity", seed=0)
    train = Dataset.from_list(records[:32])
    validation = Dataset.from_list(records[32:])
    tcfg = config.TrainingConfig(epochs=2, batch_size=4, learning_rate=1e-3,
                                 num_hard_negatives=1, early_stopping_patience=5,
                                 grad_cache_chunk_size=0 if chunking.startswith("t")
                                 else int(chunking),
                                 sub_batch_tokens=int(chunking[1:]) if chunking.startswith("t")
                                 else 0)
    training.train_retriever(model, train, validation, tcfg, out_dir, show_progress=False,
                             unfreeze=UnfreezeSchedule(new, every_epochs=1))
    rank = torch.distributed.get_rank()
    sampler = batching.batch_plan(train, tcfg, model.tokenizer, model.max_passage_length,
                                  rank, 2)
    batches = {}
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        batches[epoch] = list(sampler)
    (Path(out_dir) / f"rank{rank}_batches.json").write_text(json.dumps(batches))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if k != "passage_projection.weight" and k != "passage_projection.bias"},
              str(Path(out_dir) / f"rank{rank}.safetensors"))
    distributed.finish()


if __name__ == "__main__":
    main(*sys.argv[1:4])
