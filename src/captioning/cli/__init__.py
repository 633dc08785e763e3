"""`python -m captioning COMMAND`: argument parsing, one handler a command, and the `caption --out`
results file. The top layer: it may import everything, and nothing imports it.
"""
