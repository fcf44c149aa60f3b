"""rayedit.data"""
