"""The bundled benchmark: a tiny base, two specialists, and an evolved merge of them."""
