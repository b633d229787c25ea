"""One module per ``fvlm`` subcommand: ``NAME``, ``HELP``, ``add_parser(sub)`` and ``run(args) -> exit code``.

A command only translates flags into one typed library call and its result into an exit code; the work (job
lists, pools, failure reports, input checks) lives in the library, which never imports this package.
:mod:`fvlm.cli` assembles the parser from these modules.
"""
