"""Data preparation: tokenizers from local folders, indexed-dataset writing, SFT examples, packing
and the packed windows training reads."""
