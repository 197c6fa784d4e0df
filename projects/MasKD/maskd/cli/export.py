"""Export MasKD checkpoints model-zoo style.

    # the student of a stage-2 run, for vanilla detectron2 (writes student.pth and student.yaml)
    python tools/export.py student --config-file configs/.../<stage-2>.yaml \\
        --checkpoint output/<stage-2>/model_final.pth --output release/student.pth

    # the tokens of a stage-1 run, for MODEL.MASKD.TOKENS_WEIGHTS
    python tools/export.py tokens --checkpoint output/<stage-1>/model_final.pth \\
        --output release/tokens.pth

Config overrides may follow (yacs KEY VALUE pairs, LazyConfig key=value). Existing files are
never overwritten without --force. The student config can then be used by
plain detectron2: tools/train_net.py --config-file student.yaml --eval-only.
"""

import argparse
import logging

from detectron2.utils.logger import setup_logger

from ..checkpoint.export import export_student, export_tokens
from ..config import load_config
from ..utils.extensions import add_import_argument, import_modules


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("what", choices=["student", "tokens"])
    parser.add_argument(
        "--checkpoint", required=True, help="a stage-2 (student) or stage-1 (tokens) checkpoint"
    )
    parser.add_argument("--output", required=True, help="the .pth file to write")
    parser.add_argument(
        "--config-file",
        default="",
        help="student: the stage-2 config, to write the student's config",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    add_import_argument(
        parser, "import a module of your own before the config is read (see train_net.py)"
    )
    # Anything else is a config override (yacs "KEY VALUE" pairs, LazyConfig "key=value").
    args, args.opts = parser.parse_known_args(argv)
    setup_logger(name="maskd")
    import_modules(args.imports)
    if args.what == "student":
        cfg = load_config(args.config_file, args.opts) if args.config_file else None
        export_student(
            args.checkpoint, args.output, cfg, overwrite=args.force, config_file=args.config_file
        )
    else:
        export_tokens(args.checkpoint, args.output, overwrite=args.force)
    logging.getLogger("maskd").info("done: %s", args.output)


if __name__ == "__main__":
    from maskd.cli.export import main as _main

    _main()
