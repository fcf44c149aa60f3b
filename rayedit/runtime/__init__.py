"""rayedit.runtime"""
