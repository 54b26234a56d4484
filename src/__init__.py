"""VISOR: VISion On Request."""
