"""Networks: layers with hand-written backprop, output heads, optimizers, the Sequential
model and its checkpoints. Built on the array layer only."""
