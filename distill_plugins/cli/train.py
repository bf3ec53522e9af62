"""distill-train: ``fairseq-train`` with fairseq-distill loaded and ``--bf16`` working on GPUs.

fairseq 0.12.3 sets ``args.tpu = True`` whenever ``--bf16`` is given (options.py), which then
fails with ``'NoneType' object has no attribute 'xla_device'`` on GPUs. This entry point parses the
arguments exactly as fairseq-train does and undoes that unless ``--tpu`` was asked for; everything
else is fairseq-train. ``--user-dir`` defaults to this package. ``--help`` lists the options of the
chosen ``--task``, ``--criterion`` and ``--arch`` too (fairseq-train's stops before adding them):
``distill-train DATA --task instruction_distillation --criterion skew_kl --arch kd_gpt2_tiny --help``.
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
    helps = ("-h", "--help")

    def parse_args_and_arch(parser, input_args=None, *args, **kwargs):
        # fairseq answers --help before it has added the task's, criterion's and model's options;
        # here they are all added first (fairseq does it as it parses), then the help is printed
        given = sys.argv[1:] if input_args is None else list(input_args)
        if any(a in helps for a in given):
            try:
                parse(parser, [a for a in given if a not in helps], *args, **kwargs)
            except (SystemExit, RuntimeError):  # no DATA or --arch yet: fairseq's own (general) help
                return parse(parser, input_args, *args, **kwargs)
            parser.print_help()
            sys.exit(0)
        parsed = parse(parser, input_args, *args, **kwargs)
        if getattr(parsed, "bf16", False) and "--tpu" not in argv:
            parsed.tpu = False
        return parsed

    options.parse_args_and_arch = parse_args_and_arch
    train.cli_main()


if __name__ == "__main__":
    main()
