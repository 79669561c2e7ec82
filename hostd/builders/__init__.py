"""hostd/builders"""
