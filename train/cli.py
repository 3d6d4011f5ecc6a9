"""`python -m train`: parse, resolve the config, train, exit non-zero with a clear message on bad input."""
from __future__ import annotations

import logging
import sys

from train.checkpoint import CheckpointError
from train.config import get_args_parser, resolve_config
from train.data import DatasetError

log = logging.getLogger("train")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    from train.engine import fit, setup_logging

    setup_logging(None)
    try:
        cfg = resolve_config(args)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        best = fit(cfg)
    except (DatasetError, CheckpointError, FileExistsError, ValueError, FloatingPointError) as exc:
        log.error("%s", exc)
        return 2
    if best:
        log.info("done: %s  best val acc %.4f  macro-F1 %.4f  (epoch %d)", cfg.run_dir, best["val_acc"],
                 best["val_macro_f1"], best["epoch"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
