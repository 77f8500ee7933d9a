"""What a model must offer to be resharded (the contract: `stack_layers`, `LayerStack`,
`FunctionalModel`), mesh-independent randomness, and the pipelined loss over `pipe`.

Imports: `layout` (and `meshscale.errors`).
"""
