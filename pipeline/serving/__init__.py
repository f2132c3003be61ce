"""Online serving: neighbours of ids, vectors and new records over HTTP, from a latents table's index."""
