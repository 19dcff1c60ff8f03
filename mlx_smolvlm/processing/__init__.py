"""Inputs: tokenizer and chat template, images, videos, chat messages, image fetching."""

from .processor import Processor, apply_chat_template

__all__ = ["Processor", "apply_chat_template"]
