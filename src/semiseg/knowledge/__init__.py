"""semiseg.knowledge"""
