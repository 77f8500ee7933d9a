"""One module per `meshscale` subcommand: each defines ``add(subparsers)``, which adds the
subcommand's parser and arguments and sets ``run`` as its default, and ``run(args)``, which
does the work and returns the exit status. `meshscale.app.cli` owns the top-level parser
and dispatch; options more than one subcommand shares live in `options`. Nothing at module
level starts the JAX backend: a command sets its device environment before it imports.
"""
