"""distill-train: ``fairseq-train`` with fairseq-distill loaded and ``--bf16`` working on GPUs.

fairseq 0.12.3 sets ``args.tpu = True`` whenever ``--bf16`` is given (options.py), which then
fails with ``'NoneType' object has no attribute 'xla_device'`` on GPUs. This entry point parses the
arguments exactly as fairseq-train does and undoes that unless ``--tpu`` was asked for; everything
else is fairseq-train. ``--user-dir`` defaults to this package.
"""
import os
import sys


def main():
    from fairseq import options
    from fairseq_cli import train

    argv = sys.argv[1:]
    if not any(a == "--user-dir" or a.startswith("--user-dir=") for a in argv):
        sys.argv[1:1] = ["--user-dir", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    parse = options.parse_args_and_arch

    def parse_args_and_arch(*args, **kwargs):
        parsed = parse(*args, **kwargs)
        if getattr(parsed, "bf16", False) and "--tpu" not in argv:
            parsed.tpu = False
        return parsed

    options.parse_args_and_arch = parse_args_and_arch
    train.cli_main()


if __name__ == "__main__":
    main()
