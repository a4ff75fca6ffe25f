"""Zen protocol server: the book's chapter 7 as a production daemon."""
