"""Worker for tests/test_checkpoint.py: trains a tiny expanded retriever (dropout on, one new
layer unfrozen in epoch 2, one hard negative drawn from three) with a checkpoint every two steps,
then writes its final weights and the validation metrics of its best model.

    python tests/resume_worker.py RECORDS OUT_DIR RESUME(0/1) SECONDS_PER_STEP
"""

import json
import sys
import time
from pathlib import Path


def main(records_file: str, out_dir: str, resume: str, seconds_per_step: str) -> None:
    from datasets import Dataset
    from safetensors.torch import save_model
    from toy import worker_model  # this script's folder is on sys.path

    from retrieval_lib import training
    from retrieval_lib.evaluation import evaluate_retriever
    from retrieval_lib.models import DualTowerRetriever, UnfreezeSchedule, expand_layers, losses
    from retrieval_lib.settings import config

    records = json.loads(Path(records_file).read_text(encoding="utf-8"))
    model = worker_model(records)
    new = expand_layers(model.encoder, 1, init="random", seed=0)
    for layer in model.encoder.layers:  # dropout, so that the torch RNG state matters
        layer.self_attn.attention_dropout = 0.2
    delay = float(seconds_per_step)
    if delay:  # slow every step down so that the test can kill the process mid-epoch
        loss_fn = losses.cross_device_info_nce

        def slow_loss(*args, **kwargs):
            time.sleep(delay)
            return loss_fn(*args, **kwargs)

        losses.cross_device_info_nce = slow_loss
    train, validation = Dataset.from_list(records[:32]), Dataset.from_list(records[32:])
    tcfg = config.TrainingConfig(epochs=3, batch_size=4, learning_rate=2e-3,
                                 num_hard_negatives=1, early_stopping_patience=5,
                                 checkpoint_steps=2, keep_checkpoints=2)
    history = training.train_retriever(model, train, validation, tcfg, out_dir,
                                       show_progress=False, resume=resume == "1",
                                       unfreeze=UnfreezeSchedule(new, every_epochs=1))
    out = Path(out_dir)
    save_model(model, str(out / "final.safetensors"))
    best = DualTowerRetriever.load(out / "best")
    metrics = evaluate_retriever(best, validation, ks=(5, 10))["aggregate"]
    (out / "result.json").write_text(json.dumps(
        {"metrics": {k: v["mean"] for k, v in metrics.items()},
         "steps": history["steps"], "epochs": [
             {k: v for k, v in e.items() if not k.endswith("time_s")}
             for e in history["epochs"]],
         "best_epoch": history["best_epoch"],
         "resumed_from": history.get("resumed_from", [])}), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:5])
