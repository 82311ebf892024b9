"""How a program reads its argv: GNU getopt_long, with per-tool option tables. Pure.

Why tables: getopt_long reads any unambiguous prefix of a long option as that option
(`rm --recu` is `rm --recursive`, `--no-preserve-r` is `--no-preserve-root`), and an option
that takes an argument swallows the next word (`cp -t DIR`), which is then no operand.

Every reading errs towards the worse one, so a table that misses options of the real
program can only make a rule match more often, never less:
  - an exact name wins (`curl --data` is not `--data-binary`);
  - a prefix of exactly one option is that option; a prefix of several (getopt refuses to run)
    is read as all of them;
  - a long option the table does not know is kept as given and, in `long_given()`, counts as
    any rule option it is a prefix of (the program may have that option and accept the prefix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

NO, REQUIRED, OPTIONAL = 0, 1, 2  # has_arg, as in struct option


@dataclass(frozen=True, slots=True)
class OptionTable:
    """One program's options: long names with their has_arg, and the short letters that
    take an argument (attached, `-Tfile`, or the next word, `-T file`)."""

    long: Mapping[str, int] = field(default_factory=dict)
    short_arg: frozenset[str] = frozenset()
    short_optarg: frozenset[str] = frozenset()  # optional argument: attached only


def _t(long: str, short_arg: str = "", short_optarg: str = "") -> OptionTable:
    """Compact table: "name name= name?" means no / required / optional argument."""
    table: dict[str, int] = {}
    for word in long.split():
        if word.endswith("="):
            table[word[:-1]] = REQUIRED
        elif word.endswith("?"):
            table[word[:-1]] = OPTIONAL
        else:
            table[word] = NO
    return OptionTable(table, frozenset(short_arg), frozenset(short_optarg))


_COMMON = "help version"
# From the GNU coreutils, curl, wget and git sources (long options only as far as they matter
# for reading prefixes and arguments; see the module doc for why a partial table is safe).
TABLES: dict[str, OptionTable] = {
    "rm": _t(f"force interactive? one-file-system no-preserve-root preserve-root? recursive dir "
             f"verbose {_COMMON}"),
    "chmod": _t(f"changes recursive no-preserve-root preserve-root quiet reference= silent verbose "
                f"dereference no-dereference {_COMMON}"),
    "chown": _t(f"changes dereference no-dereference from= no-preserve-root preserve-root quiet "
                f"silent recursive reference= verbose {_COMMON}"),
    "cp": _t(f"archive attributes-only backup? copy-contents debug dereference force interactive "
             f"link no-clobber no-dereference no-preserve= no-target-directory one-file-system "
             f"parents preserve? recursive reflink? remove-destination sparse= "
             f"strip-trailing-slashes suffix= symbolic-link target-directory= update? verbose "
             f"keep-directory-symlink context? {_COMMON}", short_arg="St"),
    "mv": _t(f"backup? context debug exchange force interactive no-clobber no-copy "
             f"no-target-directory strip-trailing-slashes suffix= target-directory= update? "
             f"verbose {_COMMON}", short_arg="St"),
    "ln": _t(f"backup? directory force interactive logical no-dereference no-target-directory "
             f"physical relative suffix= symbolic target-directory= verbose {_COMMON}",
             short_arg="St"),
    "shred": _t(f"exact force iterations= size= random-source= remove? verbose zero {_COMMON}",
                short_arg="ns"),
    "curl": _t(
        "data= data-ascii= data-binary= data-raw= data-urlencode= form= form-string= json= "
        "upload-file= output= output-dir= remote-name remote-name-all header= proxy-header= "
        "user= request= url= config= cookie= cookie-jar= user-agent= referer= max-time= "
        "connect-timeout= retry= location insecure silent show-error fail verbose include head "
        "get compressed cacert= capath= cert= key= proxy= socks5= socks5-hostname= resolve= "
        "connect-to= interface= dns-servers= unix-socket= abstract-unix-socket= write-out= "
        "dump-header= trace= trace-ascii= stderr= netrc netrc-file= oauth2-bearer= ftp-pasv "
        "quote= range= limit-rate= variable= expand-url= " + _COMMON,
        short_arg="dFTuoHXKeAbcEDryYzmwxUQPCV", short_optarg=""),
    "wget": _t(
        "post-data= post-file= body-data= body-file= method= output-document= output-file= "
        "append-output= input-file= header= user= password= http-user= http-password= "
        "directory-prefix= tries= timeout= wait= quota= execute= level= accept= reject= "
        "domains= user-agent= load-cookies= save-cookies= recursive mirror no-check-certificate "
        "quiet verbose continue background spider page-requisites convert-links " + _COMMON,
        short_arg="oOaiBtTwQPUelARDXIh"),
}
# git: global options (git.c parses them itself, exactly) and one table per subcommand.
GIT_GLOBAL = _t("git-dir= work-tree= namespace= exec-path? config-env= super-prefix= bare "
                "no-pager paginate no-replace-objects literal-pathspecs glob-pathspecs "
                "noglob-pathspecs icase-pathspecs no-optional-locks list-cmds= " + _COMMON,
                short_arg="Cc")
GIT_SUBCOMMANDS: dict[str, OptionTable] = {
    "push": _t("all branches mirror delete tags dry-run porcelain force force-with-lease? "
               "force-if-includes repo= set-upstream thin receive-pack= exec= prune no-verify "
               "verify follow-tags signed? atomic push-option= recurse-submodules= quiet verbose "
               "progress ipv4 ipv6", short_arg="o"),
    "clean": _t("dry-run force interactive quiet exclude= ", short_arg="e"),
    "reset": _t("mixed soft hard merge keep quiet no-quiet recurse-submodules? patch "
                "pathspec-from-file= pathspec-file-nul intent-to-add"),
}


@dataclass(slots=True)
class ParsedArgs:
    """An argv tail as the program reads it: options given and the operands left over."""

    short: set[str] = field(default_factory=set)  # short option letters
    long: set[str] = field(default_factory=set)  # long options, as the program reads them
    loose: set[str] = field(default_factory=set)  # long names no table knows: see long_given()
    operands: list[tuple[int, str]] = field(default_factory=list)  # (index in argv, text)

    def long_given(self, name: str) -> bool:
        """Is the long option `name` (without `--`) given, as the program reads its argv?"""
        return name in self.long or any(name.startswith(p) for p in self.loose)


def _long(name: str, table: OptionTable | None, out: ParsedArgs) -> int:
    """Record one long option; its has_arg (NO when unknown or ambiguous)."""
    if table is None:
        out.loose.add(name)
        return NO
    if name in table.long:  # an exact name always wins over longer ones it prefixes
        out.long.add(name)
        return table.long[name]
    hits = [o for o in table.long if o.startswith(name)]
    if len(hits) == 1:
        out.long.add(hits[0])
        return table.long[hits[0]]
    if hits:  # ambiguous: getopt refuses to run; reading it as all of them errs safe
        out.long.update(hits)
        return NO
    out.loose.add(name)  # an option the table lacks (or a typo the program rejects)
    return NO


def parse(
    table: OptionTable | None, args: Sequence[str], start: int = 1, *, permute: bool = True
) -> tuple[ParsedArgs, int]:
    """Parse `args` (argv from index `start`) with getopt_long rules. Returns the result and
    the index where parsing stopped (len(args) unless `permute` is False and an operand was
    met: git's global options stop at the subcommand)."""
    out = ParsedArgs()
    i, n = start, len(args)
    while i < n:
        a = args[i]
        if a == "--":
            out.operands.extend((j, args[j]) for j in range(i + 1, n))
            return out, n
        if a.startswith("--"):
            name, eq, _ = a[2:].partition("=")
            # `--=x` names no option: getopt rejects it and the program does nothing.
            has_arg = _long(name, table, out) if name else NO
            if has_arg == REQUIRED and not eq:
                i += 1  # the next word is this option's argument, not an operand
        elif a.startswith("-") and len(a) > 1:
            letters = a[1:]
            for k, c in enumerate(letters):
                out.short.add(c)
                if table is not None and c in table.short_arg:
                    if k == len(letters) - 1:
                        i += 1  # `-t DIR`
                    break  # `-tDIR`: the rest of the word is the argument
                if table is not None and c in table.short_optarg:
                    break
        else:
            if not permute:
                return out, i
            out.operands.append((i, a))
        i += 1
    return out, n


def parse_argv(tool: str, argv: Sequence[str]) -> ParsedArgs:
    """Options and operands of `argv` for the program called `tool` (a file name)."""
    if tool == "git":
        glob, stop = parse(GIT_GLOBAL, argv, permute=False)
        if stop >= len(argv):
            return glob
        sub = argv[stop]
        rest, _ = parse(GIT_SUBCOMMANDS.get(sub), argv, stop + 1)
        rest.short |= glob.short
        rest.long |= glob.long
        rest.loose |= glob.loose
        rest.operands.insert(0, (stop, sub))  # the subcommand stays an operand (args_any)
        return rest
    parsed, _ = parse(TABLES.get(tool), argv)
    return parsed
