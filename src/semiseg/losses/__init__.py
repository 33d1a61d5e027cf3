"""semiseg.losses"""
