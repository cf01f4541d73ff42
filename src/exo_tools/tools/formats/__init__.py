"""One module per tool-call format; ``exo_tools.tools.registry`` lists them."""
