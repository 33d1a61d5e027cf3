"""semiseg.data"""
