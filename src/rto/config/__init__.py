"""Configs: the machinery (core), the shared sections, and one config per stage."""

from rto.config.core import build, load_yaml, option, save_yaml, section, to_dict, validate

__all__ = ["build", "load_yaml", "option", "save_yaml", "section", "to_dict", "validate"]
