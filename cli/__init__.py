"""The ``klseg`` command line (installed as ``klseg.cli``)."""
