"""distill-chain: run a teacher -> assistant(s) -> student chain (TAKD) of fairseq-train stages.

    distill-chain examples/takd/chain.yaml              # run, or resume, the chain
    distill-chain examples/takd/chain.yaml --dry-run    # print the plan and the fairseq-train commands

Each stage's selected checkpoint becomes the --teacher-path of the stages naming it as teacher.
Rerunning skips finished stages whose recorded checkpoint sha256 and settings are unchanged, resumes
an interrupted stage from its checkpoint_last.pt, and retrains a changed stage and every stage after
it (listed before anything runs). The record is <output_dir>/manifest.json.
"""
import argparse
import signal

from ..chain.config import load_chain
from ..chain.runner import ChainRunner


def get_parser():
    p = argparse.ArgumentParser(prog="distill-chain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("config", help="chain file (YAML or JSON)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the exact fairseq-train commands; run nothing")
    p.add_argument("--output-dir", help="where the stages and manifest.json go (default: the file's output_dir, "
                                        "else checkpoints/<name>)")
    p.add_argument("--verbose", action="store_true", help="echo fairseq-train's full output, not only validation lines")
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = get_parser().parse_args(argv)
    chain = load_chain(args.config, output_dir=args.output_dir)
    signal.signal(signal.SIGTERM, _interrupt)
    ChainRunner(chain, verbose=args.verbose).run(dry_run=args.dry_run)


if __name__ == "__main__":
    main()
