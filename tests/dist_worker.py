"""Run a MasKD trainer in several CPU processes (GLOO) and dump what each rank holds.

    python tests/dist_worker.py CONFIG.yaml OUT_DIR NUM_PROCS DIST_URL NAME JSON IMAGES [...]

Each rank writes OUT_DIR/rank<k>.pt with its trainable weights after training, and checks that
the DDP wrapper synchronises no teacher (or, in stage 2, token) parameter.
"""

import os
import sys

import torch
from detectron2.engine import launch
from torch.nn.parallel import DistributedDataParallel

import maskd  # noqa: F401
from maskd.config import get_maskd_cfg
from maskd.engine import MasKDTrainer, register_coco_datasets


def worker(config_file, out_dir, datasets):
    register_coco_datasets(datasets)
    cfg = get_maskd_cfg()
    cfg.merge_from_file(config_file)
    cfg.OUTPUT_DIR = out_dir
    trainer = MasKDTrainer(cfg)
    ddp = trainer.model
    assert isinstance(ddp, DistributedDataParallel), type(ddp)
    assert not ddp.find_unused_parameters
    synced = {n for n, p in ddp.module.named_parameters() if p.requires_grad}
    assert synced and not any(n.startswith("teacher.") and "tokens" not in n for n in synced)
    if cfg.MODEL.META_ARCHITECTURE == "MasKD":
        assert not any(n.startswith("tokens.") for n in synced)
    trainer.train()
    state = {n: p.detach().clone() for n, p in ddp.module.named_parameters() if p.requires_grad}
    rank = torch.distributed.get_rank()
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    config_file, out_dir, num_procs, dist_url = sys.argv[1:5]
    rest = sys.argv[5:]
    datasets = [rest[i : i + 3] for i in range(0, len(rest), 3)]
    launch(
        worker,
        int(num_procs),
        dist_url=dist_url,
        args=(config_file, out_dir, datasets),
    )
