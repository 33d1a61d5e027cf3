"""semiseg.methods"""
