"""Pure tensor operations shared by layers that may not import each other (mcore/ and adapters/):
no communication, no Megatron, no other package imports."""
