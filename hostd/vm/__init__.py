"""hostd/vm"""
