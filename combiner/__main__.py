"""``python -m combiner``: the supervisor (:mod:`combiner.supervisor`). It needs the server
stack, which a client-only install (the SDK alone) leaves out: say so plainly."""

import sys

try:
    from combiner.supervisor import main
except ModuleNotFoundError as e:
    sys.stderr.write(
        f"python -m combiner: {e.name!r} is missing: the combiner needs the server stack, which "
        "the client-only install leaves out: pip install 'chorus-ensembles[server]'\n"
    )
    raise SystemExit(1) from None

main()
