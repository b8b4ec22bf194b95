"""data_prep: public medical datasets -> a MegaMedical-style corpus of 2D binary tasks."""
