"""Glue to outside orchestrators that restart a meshscale job with another worker count.

Each integration is an optional extra (``pip install 'meshscale[ray]'``) and is imported
by its own module path (``meshscale.integrations.ray``), never from here, so importing
meshscale never imports an orchestrator.
"""
