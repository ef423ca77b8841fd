"""Interoperability checks against Hugging Face transformers and PEFT (optional dependencies).

The only package modules that import transformers or peft; they do so inside functions, so the
rest of the package never needs them.
"""
