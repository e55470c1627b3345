"""One pre-norm transformer layer, configured by `TransformerConfig`, serves both towers."""
