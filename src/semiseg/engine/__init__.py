"""semiseg.engine"""
