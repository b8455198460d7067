"""Pure-function model definitions: one module per tower, the thinker that joins them, 3-D positions."""
