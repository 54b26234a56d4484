"""Python face of csrc/: the attention dispatch point and registered ops with pure-PyTorch references."""
