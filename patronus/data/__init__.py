"""Reading users' data: image folders with captions, as diffusers' training scripts write them."""
