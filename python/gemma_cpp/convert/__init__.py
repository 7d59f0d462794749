"""Readers of checkpoint formats: each turns a file into named numpy arrays (views into a
memory map where the bytes can be used as they are)."""
