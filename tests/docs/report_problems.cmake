# Fails with the list of code blocks the documentation test could not check (no marker, bad
# marker, unclosed fence): every ```cpp block of the checked pages must be compiled or be a
# snippet of a built example.
cmake_minimum_required(VERSION 3.25)
file(READ "${PROBLEMS}" problems)
message(FATAL_ERROR "documentation blocks that are not checked:\n${problems}")
