"""Files on disk, below any one format's directory layout: the error every reader raises, safe
relative paths, the safetensors header and dtype codes, and files whose writeback starts while
they are written.  Shared by our sharded checkpoints (checkpoint/) and Hugging Face model
directories (hf/); imports nothing else of the package."""
