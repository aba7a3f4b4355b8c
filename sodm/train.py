"""`python -m sodm.train`: one training run of any method (sodm, gaussian, macer, smoothadv), in
this process (the loop in `sodm.loop`) or data-parallel over Ray Train workers (`--num-workers K`,
`sodm.distributed`), with per-epoch atomic checkpoints, exact resume and certification of a test
subset at the end.

    python -m sodm.train --dataset cifar10 --data-dir D --arch cifar_resnet110 --sigma 0.25 --method sodm
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sodm import cli
from sodm.certify import CertifySettings
from sodm.checkpoint import CheckpointError
from sodm.cluster import ClusterError, StorageError, check_shared_storage, init_ray, storage_exists
from sodm.config import FLAT_CERT_KEYS, ConfigError, TrainConfig, make_config
from sodm.data import DataError, load_dataset
from sodm.loop import train

# ---------------------------------------------------------------------------------------------
# command line: every config key is a flag (--lr-milestones 35,50; --no-amp; --cert-max none);
# the certification settings are the --cert-* flags

def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="sodm.train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {k: f for k, f in TrainConfig.model_fields.items() if k != "certify"}
    fields.update({flat: CertifySettings.model_fields[key] for flat, key in FLAT_CERT_KEYS.items()})
    for name, field in fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            p.add_argument(flag, dest=name, default=None,
                           action=argparse.BooleanOptionalAction)
        else:
            p.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                           help=field.description)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir (refused when there is none there)")
    return p


def _parse_value(name: str, raw: str):
    if raw.lower() in ("none", "null", ""):
        return None
    if name == "lr_milestones":
        try:
            return [int(v) for v in raw.split(",") if v.strip()]
        except ValueError:
            raise cli.UsageError(f"--lr-milestones takes comma-separated epochs, got {raw!r}") from None
    return raw


def main(argv=None) -> int:
    args = vars(_parser().parse_args(argv))
    resume = args.pop("resume")
    given = {k: (_parse_value(k, v) if isinstance(v, str) else v) for k, v in args.items()
             if v is not None}
    try:
        cfg = make_config(**given)
        out_dir = Path(cfg.out_dir).expanduser()
        try:  # a folder that cannot be made is refused before any work
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise cli.UsageError(f"--out-dir {out_dir}: cannot create it ({e.strerror or e})") from None
        if cfg.dataset != "digits":
            load_dataset(cfg.dataset, "test", cfg.data_dir, download=cfg.download)
        if cfg.num_workers > 0:
            from sodm import distributed  # Ray is imported only for a Ray Train run

            run_path = distributed.run_storage(cfg)
            if resume and not storage_exists(run_path):
                raise cli.UsageError(f"--resume: {Path(cfg.out_dir).expanduser().resolve()} holds "
                                     f"no run to resume ({run_path} does not exist); check the "
                                     "folder, or drop --resume to start a new run")
            init_ray()  # a Ray of several nodes must share a local storage path: say so first
            check_shared_storage(cfg.storage or str(out_dir.resolve()), f"--num-workers {cfg.num_workers}")
            distributed.run(cfg, resume=resume)
        else:
            ckpt = Path(cfg.out_dir).expanduser().resolve() / "checkpoint.pt"
            if resume and not ckpt.exists():
                raise cli.UsageError(f"--resume: {ckpt.parent} holds no run to resume (no "
                                     f"{ckpt.name}); check the folder, or drop --resume to start "
                                     "a new run")
            train(cfg, resume=resume)
    except (ConfigError, DataError, CheckpointError, StorageError, ClusterError) as e:
        raise cli.UsageError(str(e)) from None
    return 0


def console() -> None:
    sys.exit(cli.run(main, "sodm.train"))


if __name__ == "__main__":
    console()
