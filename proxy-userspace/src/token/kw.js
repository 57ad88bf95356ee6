// Keyward-Token placeholder
