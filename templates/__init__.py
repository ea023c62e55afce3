"""Jinja2 templates of generated scripts (installed as package data)."""
