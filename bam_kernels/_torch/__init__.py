"""The CPU paths of the ops (the torch backend), one module per op, named like the op's public module."""
