/*
 * CPU features and the kernel level (cpu.c); the public part is in moe.h
 * (moe_cpu_isa, moe_isa_name, moe_cpu_notes, ...).
 */
#ifndef MOE_CPU_H
#define MOE_CPU_H

#include "internal.h"

/* The level (the public moe_cpu_isa() also makes the kernel table). */
moe_isa moe__cpu_level(void);
/* 1 if MOE_MAX_CPU_ISA lowered the level below the CPU's best. */
int moe__cpu_capped(void);
/* Add a line to moe_cpu_notes(), once per kind (key): a kind said before
 * is only counted (thread-safe; no allocation). moe__cpu_note's key is the
 * format string itself. */
void moe__cpu_note_kind(const char *key, const char *fmt, ...) MOE_PRINTF(2, 3);
#define moe__cpu_note(...) moe__cpu_note_kind(MOE__FIRST(__VA_ARGS__, 0), __VA_ARGS__)
#define MOE__FIRST(a, ...) a

#endif
