// kvblk snapshot: lists, creates, applies and deletes the internal snapshots
// of a qcow2 image (qemu-img snapshot).
//
// Lookup follows qemu-img 7.2: -a takes an ID or, failing that, a name; -d
// takes a name. Unlike qemu-img, -c refuses a name that is already in use,
// so that a name always picks one snapshot.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "disk/qcow2_device.h"
#include "kvblk/block_device.h"
#include "kvblk/event_loop.h"
#include "tools/cli_util.h"
#include "tools/commands.h"

namespace kvblk::cli {

namespace {

constexpr const char* kCmd = "snapshot";

std::vector<OptionSpec> SnapshotSpecs() {
  return {
      {'l', "", "", "list the snapshots (the default when no other action is given)"},
      {'c', "", "NAME", "create a snapshot named NAME of the current contents"},
      {'a', "", "SNAPSHOT", "apply (revert the image to) a snapshot, by ID or name"},
      {'d', "", "NAME", "delete the snapshot named NAME"},
      {'q', "", "", "quiet: print nothing on success"},
      HelpOption(),
  };
}

void PrintHelp() {
  std::printf(
      "usage: kvblk snapshot [-q] [-l | -c NAME | -a SNAPSHOT | -d NAME] FILE\n"
      "\n"
      "Manages the internal snapshots of the qcow2 image FILE, like qemu-img snapshot.\n"
      "Only one action may be given; without one the snapshots are listed, in\n"
      "qemu-img's table (ID, TAG, VM SIZE, DATE, VM CLOCK, ICOUNT). -a looks a\n"
      "snapshot up by ID first, then by name; -d by name. Snapshot names must be\n"
      "unique. The image must not be in use (run it offline).\n"
      "\n"
      "%s",
      FormatOptionHelp(SnapshotSpecs()).c_str());
}

// Opens `path` writable (or read-only for listing) and checks that it is a
// qcow2 image; raw images have no snapshots.
Result<std::unique_ptr<BlockDevice>> OpenQcow2(const std::string& path, bool read_only) {
  KVBLK_ASSIGN_OR_RETURN(std::string format, ProbeFormat(path));
  if (format != "qcow2") {
    return Status::NotSupported(path + ": " + format +
                                " images have no internal snapshots (only qcow2 has them)");
  }
  OpenOptions o;
  o.format = "qcow2";
  o.read_only = read_only;
  o.open_backing = false;  // snapshots never read the backing file
  return OpenImage(path, o);
}

}  // namespace

int RunSnapshot(const std::vector<std::string>& args) {
  Result<ParsedArgs> parsed = ParseArgs(args, SnapshotSpecs());
  if (!parsed.ok()) return Fail(kCmd, parsed.status());
  const ParsedArgs& a = *parsed;
  if (a.Has("help")) {
    PrintHelp();
    return 0;
  }
  int actions = 0;
  char action = 'l';
  for (const char* opt : {"l", "c", "a", "d"}) {
    if (a.Count(opt) == 0) continue;
    actions += static_cast<int>(a.Count(opt));
    action = opt[0];
  }
  if (actions > 1) return Fail(kCmd, "Cannot mix '-l', '-a', '-c', '-d'");
  const std::vector<std::string>& pos = a.positional();
  if (pos.size() != 1) return Fail(kCmd, "Expecting one image file name");
  const std::string& path = pos[0];
  const std::string name = action == 'l' ? "" : a.Get(std::string(1, action));

  if (action == 'l') {
    Result<std::string> format = ProbeFormat(path);
    if (!format.ok()) return Fail(kCmd, format.status());
    if (*format != "qcow2") return 0;  // raw: no snapshots, nothing to print
  }
  Result<std::unique_ptr<BlockDevice>> dev = OpenQcow2(path, action == 'l');
  if (!dev.ok()) {
    if (action == 'l') return Fail(kCmd, dev.status());
    const char* verb = action == 'c' ? "create" : action == 'a' ? "apply" : "delete";
    return Fail(kCmd, std::string("Could not ") + verb + " snapshot '" + name +
                          "': " + dev.status().message());
  }
  auto* q = static_cast<qcow2::Qcow2Device*>(dev->get());
  Status st;
  std::string verb;
  switch (action) {
    case 'l': {
      std::vector<SnapshotInfo> snaps = q->ListSnapshots();
      if (!snaps.empty()) std::fputs(FormatSnapshotTable(snaps).c_str(), stdout);
      break;
    }
    case 'c':
      verb = "create";
      st = RunSync(q->CreateSnapshot(name));
      break;
    case 'a':
      verb = "apply";
      st = RunSync(q->ApplySnapshot(name));
      break;
    case 'd': {
      verb = "delete";
      // qemu-img finds the snapshot to delete by name only.
      bool found = false;
      for (const SnapshotInfo& s : q->ListSnapshots()) found = found || s.name == name;
      if (!found) {
        Status closed = CloseImage(std::move(*dev));
        (void)closed.ok();
        return Fail(kCmd, "Could not delete snapshot '" + name + "': snapshot not found");
      }
      st = RunSync(q->DeleteSnapshot(name));
      break;
    }
  }
  Status closed = CloseImage(std::move(*dev));
  if (!st.ok()) {
    return Fail(kCmd, "Could not " + verb + " snapshot '" + name + "': " + st.message());
  }
  if (!closed.ok()) return Fail(kCmd, closed);
  return 0;
}

}  // namespace kvblk::cli
