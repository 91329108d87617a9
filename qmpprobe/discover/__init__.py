"""What a QEMU binary has: machine types, models, features, learned from it."""
