"""What turns pixels and prompts into what the DiT reads, and back: the Wan VAE (`wan_vae`), the exact
pixel-space patch codec (`patch`), the codec a config names and uint8 frame conversions (`video`), and the
umT5 text encoder (`text_encoder`)."""
