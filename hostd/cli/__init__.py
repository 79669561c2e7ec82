"""hostd/cli"""
