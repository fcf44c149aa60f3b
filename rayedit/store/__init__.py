"""rayedit.store"""
