"""Prompt-based fine-tuning of decoder LMs (OPT, Llama family) with zeroth-order steps."""
